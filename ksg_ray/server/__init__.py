"""SERVER SIDE — never reads private data: it takes the transfer bundle (`ksg_ray.bundle`) and public inputs.
`synth/` writes the synthetic data set, `finetune/` trains the target model on it."""
