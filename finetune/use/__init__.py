"""The use wing: after training (load_model, evaluate, predict, export, calibration)."""
