"""Training: flags shared by SFT and GRPO (`arguments`), model assembly, LoRA and QLoRA (`assembly`), supervised
fine-tuning with the Trainer (`train`), GRPO with trl (`grpo`), its rewards and the quickstart."""
