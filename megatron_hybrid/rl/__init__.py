"""RL post-training math: policy losses, group advantages, verifiable rewards."""
