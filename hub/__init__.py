"""Model-card templates; installed as ``dpl_zoo.templates``."""
