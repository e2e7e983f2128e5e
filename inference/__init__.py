"""Batch inference: embedding the catalog and the users with a trained model, FAISS top-K search."""
