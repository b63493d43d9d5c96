"""Click-through-rate models: score a candidate from its feature row (``base.CTRModel``)."""
