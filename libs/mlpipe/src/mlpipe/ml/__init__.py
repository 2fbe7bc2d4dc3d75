"""Pipeline config, dataset validation, reading and splitting data, models and their inputs."""
