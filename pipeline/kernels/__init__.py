"""Kernels: infinite-width NNGP/NTK of FC and ConvNet networks (closed forms and neural-tangents), RBF, the random-feature ConvNet NNGP, and finite networks' empirical NTK."""
