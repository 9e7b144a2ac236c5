"""Data for LXMERT: public formats in (formats), a synthetic data set (synthetic), the memory-mapped
region-feature and text stores (store) and the converter that builds them (convert); the authors' pre-training
sampling with counter-based draws (sampling, philox), the batch the model eats (batch) and the loaders that
produce it (loaders: a PyTorch DataLoader over the stores, or the whole feature table on the GPU)."""
