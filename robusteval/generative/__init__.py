"""What a joint model's generative half does: denoising runs, samples and counterfactuals, and their measures."""
