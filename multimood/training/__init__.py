"""Training: supervised fine-tuning (Trainer), GRPO (trl), its rewards and the quickstart."""
