"""Run artifacts: metrics.jsonl, summary.json and the headline table."""
