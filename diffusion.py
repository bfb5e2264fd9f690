"""The DDPM: cosine schedule, q_sample, training loss, sampling (paper Eqs. 1-6, S4). Filled by the model issue."""
