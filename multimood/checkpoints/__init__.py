"""Checkpoints: weight reading (`weights`), processor and config assembly from parts (`assembly`), saved model
folders (`model_folder`), published VideoLLaMA 2 / MultiMood <-> ours conversion, Hub upload and cards (`hub`)."""
