"""The plugin's sequential recommenders, one file per model (laser.py holds Laser), found by name by utils.get_model."""
