"""The state wing: checkpoints (one schema), the background saver, resume, the trust rule
for files, atomic files, run directories."""
