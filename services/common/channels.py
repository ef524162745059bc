"""PostgreSQL NOTIFY channels shared between services (the cross-service contract)."""

# "thread_id:position" after a message in a thread is created, edited or deleted.
THREAD_EVENTS = "chat_thread_events"
# {"thread_id": ..., "user_id": ... | null} after a participant leaves or a thread is
# deleted; {"thread_id": null, "user_id": ...} after a user is deactivated or deleted.
MEMBERSHIP = "chat_membership"
