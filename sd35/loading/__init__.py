"""Reading weight files of every layout users have and turning them into our models' state dicts."""
