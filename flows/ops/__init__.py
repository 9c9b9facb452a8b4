"""Operations around the pipeline: submitting it to a Ray cluster as a job (jobs.py), scheduled and
data-triggered retraining (schedule.py), and their `gptflow` subcommands (commands.py)."""
