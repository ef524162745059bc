"""A small world made through the services' own RPCs: users, group threads, a first
message in each (so every thread has a cursor to resume from)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc
from chat.v1 import (
    messages_pb2,
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)


@dataclass(frozen=True)
class Seeded:
    users: list[str]
    threads: list[str]
    cursors: dict[str, str]  # thread -> the cursor of its first message


async def seed(
    users_address: str, threads_address: str, messages_address: str, *, users: int, threads: int
) -> Seeded:
    """`users` users; `threads` threads created by the first with all others in them."""
    async with (
        grpc.aio.insecure_channel(users_address) as uc,
        grpc.aio.insecure_channel(threads_address) as tc,
        grpc.aio.insecure_channel(messages_address) as mc,
    ):
        users_stub = users_pb2_grpc.UsersServiceStub(uc)
        threads_stub = threads_pb2_grpc.ThreadsServiceStub(tc)
        messages_stub = messages_pb2_grpc.MessagesServiceStub(mc)
        ids = []
        for _ in range(users):
            tag = f"s{uuid.uuid4().hex[:10]}"
            reply = await users_stub.CreateUser(
                users_pb2.CreateUserRequest(
                    user=users_pb2.User(email=f"{tag}@example.com", username=tag)
                )
            )
            ids.append(reply.user.id)
        made, cursors = [], {}
        for i in range(threads):
            created = await threads_stub.CreateThread(
                threads_pb2.CreateThreadRequest(
                    name=f"seeded {i}", creator_id=ids[0], participant_ids=ids[1:]
                )
            )
            sent = await messages_stub.SendMessage(
                messages_pb2.SendMessageRequest(
                    thread_id=created.thread.id, user_id=ids[0], content="first"
                )
            )
            made.append(created.thread.id)
            cursors[created.thread.id] = sent.message.cursor
        return Seeded(ids, made, cursors)
