"""Data generation: recipes (self_instruct), parsing of teacher output (parse), the run loop (loop)."""
