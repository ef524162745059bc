"""The live stream of threads (StreamThreadMessages).

hub.py is the entry point (`StreamHub.stream`: replay, caught_up, live, dedup);
fanout.py keeps one feed per thread with open streams and each stream's bounded
buffer; listener.py owns the LISTEN connection that tells the fan-out of news.
"""

from services.messages.streams.hub import StreamHub

__all__ = ["StreamHub"]
