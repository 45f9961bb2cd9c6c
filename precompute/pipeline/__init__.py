"""The precompute job: harvest → geometry → scores → overlaps over one staged cache."""
