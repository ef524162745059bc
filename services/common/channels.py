"""PostgreSQL NOTIFY channels shared between services (the cross-service contract)."""

# "thread_id:position" after a message in a thread is created, edited or deleted.
THREAD_EVENTS = "chat_thread_events"
# {"thread_id": ..., "user_id": ... | null} after a participant leaves, a thread is
# deleted or archived (flag or `db archive`); {"thread_id": null, "user_id": ...}
# after a user is deactivated or deleted. A hint only: the stream hub re-checks
# the named subscriptions against the database, which decides how they end.
MEMBERSHIP = "chat_membership"
