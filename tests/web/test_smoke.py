from __future__ import annotations

from .conftest import Server, receive, receive_until, send, turn_done


async def test_health_and_chat(server: Server) -> None:
    async with server.client(None) as c:
        r = await c.get("/health")
        assert r.status_code == 200, r.text
    async with server.client() as c:
        r = await c.post("/chat", json={"title": "hello"})
        assert r.status_code == 201, r.text
        chat = r.json()
        r = await c.get(f"/chat/{chat['id']}")
        assert r.status_code == 200, r.text
        r = await c.post("/generate", json={"message": "what is 12*7", "chat_id": chat["id"]})
        assert r.status_code == 200, r.text
        print(r.json())
    async with server.websocket() as ws:
        await send(ws, {"message": "hi there", "client_message_id": "m1"})
        frames = await receive_until(ws, turn_done)
        for f in frames[:3] + frames[-4:]:
            print(f)
