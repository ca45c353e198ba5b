"""Training entry point for torchrun / deepspeed launchers: `torchrun run_scripts/run_multimood.py --flags ...`."""

from multimood.train import main

if __name__ == "__main__":
    main()
