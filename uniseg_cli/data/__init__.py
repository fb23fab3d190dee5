"""Data: datasets on disk, the pre-processing transform shared by training and inference, the training cache."""
