from twisted.application.service import ServiceMaker

egressproxy = ServiceMaker(
    "egressproxy",
    "proxy_app.tap",
    "An egress proxy that refuses private destinations (SSRF, DNS rebinding).",
    "egressproxy",
)
