//! Reading and writing model weights: diffusers folders, single-file checkpoints in
//! the original Stable Diffusion layout, and `.ckpt` files through a restricted reader.
