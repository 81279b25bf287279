"""The three networks and the tokenizer, named as in the original Wan checkpoints
(``dit``, ``t5``, ``vae``), the tiny VAE decoder (``taehv``) and their frozen configs."""
