"""SERVER SIDE — synthesis on Ray Data: stages, prompts, filters, the resumable store and the pipeline."""
