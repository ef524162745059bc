"""Calling the chat backend from Python: channels, sends, errors and stream followers.

    channel = chat_client.connect("messages:50053", token=..., root_certificates=...)
    message = await chat_client.send_message(channel, request, metadata=as_user(alice))
    async for event in chat_client.follow_thread(channel, thread_id, metadata=as_user(bob)):
        ...

README.md, "Calling it from Python: chat_client", says what is retried and why.
"""

from chat_client.backoff import Backoff
from chat_client.channel import as_user, connect, service_config
from chat_client.errors import ChatError, FieldViolation, ResourceInfo, reason_of
from chat_client.send import SEND_RETRYABLE, send_message, with_request_id
from chat_client.streams import RESUMABLE, Follower, follow_thread, follow_user

__all__ = [
    "RESUMABLE",
    "SEND_RETRYABLE",
    "Backoff",
    "ChatError",
    "FieldViolation",
    "Follower",
    "ResourceInfo",
    "as_user",
    "connect",
    "follow_thread",
    "follow_user",
    "reason_of",
    "send_message",
    "service_config",
    "with_request_id",
]
