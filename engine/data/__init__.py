"""Data for LXMERT: public formats in (formats), a synthetic data set (synthetic), the memory-mapped
region-feature and text stores (store) and the converter that builds them (convert)."""
