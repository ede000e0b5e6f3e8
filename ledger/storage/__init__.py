"""The only layer that talks to PostgreSQL: connection targets, pools, and every SQL statement."""
