"""SERVER SIDE — fine-tuning of the target on the synthetic set: config, data, Ray Train loop, model folder."""
