"""What a person watching a run looks at: the Grafana dashboard of the project's series, the run's report page,
and a console that shows the stages' own lines (other libraries' chatter kept below WARNING)."""
