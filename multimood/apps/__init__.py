"""Apps: the Gradio web demo."""
