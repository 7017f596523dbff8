"""The data wing: cfg.data -> loaders and class names; image folders, CSVs, the
decoded-image cache, the feature cache."""
