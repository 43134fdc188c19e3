"""Export a plan to serving engines: expert-placement files and launch scripts."""
