"""Side-free building blocks: config loading, records and JSONL I/O, chat format, model resolution, LoRA, the
reward-model architecture, the run layout, text metrics and Ray Train plumbing. Imports neither side."""
