"""`make bench`: performance ratios, each against a named baseline measured in the same run."""
