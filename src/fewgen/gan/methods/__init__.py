"""GAN adaptation methods, one file each; importing ``fewgen.gan`` registers them."""
