"""The real-time service: the recommender core, its durable log, and the HTTP app."""
