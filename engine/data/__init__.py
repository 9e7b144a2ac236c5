"""Data for LXMERT: public formats in (formats), a synthetic data set (synthetic), the memory-mapped stores of
region features, pre-training text (store) and fine-tuning questions (tasks), and the converters that build them
(convert, on one skeleton for the sentence stores: build); the authors' pre-training sampling with counter-based
draws (sampling, philox), the batches the model eats (batch) and the loaders that produce them (batching: the
interface and the host-built pre-training batch; loaders: PyTorch DataLoader workers over the stores, the whole
feature table on the GPU, fine-tuning's TaskLoader; dali: NVIDIA DALI's readers)."""
