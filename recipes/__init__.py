"""Shipped training recipes (YAML); installed as ``dpl_zoo.recipes`` so ``dpl-zoo train NAME`` finds them."""
