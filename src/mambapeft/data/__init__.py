"""Data: instruction and multiple-choice text sets for language models, VTAB-style image folders for Vision Mamba."""
