"""Checkpoints: published VideoLLaMA 2 / MultiMood <-> ours conversion, model folders, Hub upload and cards."""
