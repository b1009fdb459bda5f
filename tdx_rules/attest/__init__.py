"""Evidence from a running TD: quotes and their signature chain, the CCEL event log, and checking both against a manifest."""
