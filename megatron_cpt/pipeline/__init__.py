"""The end-to-end CPT recipe (convert → preprocess → CPT → export → merge → evaluate → report)."""
