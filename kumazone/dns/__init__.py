"""The DNS server, by stage.

L{wire} checks received packets and encodes answers (pure); L{server} holds the
twisted.names factory and protocols; L{authority} answers from the VIP table;
L{hotpath} answers common queries from responses encoded once; L{udpbatch} reads
and writes datagrams in batches; L{metrics} counts and times the answers.
"""
