"""The names `Relay.stats()` reports, each with what it counts (docs/stats.md is the same
list as a table).

`COUNTERS` holds every fixed name; `stats()` gives each of them, 0 when nothing was
counted, so `stats()["policy_denied"]` works on a fresh relay. `PATTERNS` holds the
open-ended families (one counter per egress-policy rule that denied something): those
appear only once they count something. `GROUPS` is the same list in sections, as the
docs show it.

Most are counts since the relay started; a few are gauges (what is open when `stats()`
is called: `tcp_flows`, `udp_flows`, `icmp_sockets`), a peak (`tcp_ooo_peak_bytes`) or
byte totals. After a handover the new relay goes on from the old one's counts.

This module does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["COUNTERS", "GAUGES", "GROUPS", "PATTERNS", "with_zeros"]

_Rows = tuple[tuple[str, str], ...]

_FRAMES: _Rows = (
    ("frames_in", "Frames from the guest."),
    ("frames_out", "Frames sent to the guest."),
    ("frames_out_no_guest", "Frames toward the guest dropped: no transport attached."),
    ("transport_lost", "Times the guest's transport closed itself (end of file or error)."),
    ("ipv6_multicast_ignored",
     "IPv6 multicast from the guest meant for the link only (MLD, mDNS, LLMNR), not "
     "relayed."),
    ("dst_host_local_refused",
     "Guest packets to a host-local destination (0.0.0.0/8, 127.0.0.0/8 and their IPv6 "
     "forms), never relayed."),
    ("guest_solicits",
     "ARP requests or neighbour solicitations sent to learn the guest's MAC before it "
     "spoke (for a forwarded port's client)."),
    ("guest_solicit_rate_limited", "Such solicitations not sent: rate limit."),
)

_DROPS: _Rows = (
    ("drop_eth_short", "Guest frames shorter than an Ethernet header (14 bytes)."),
    ("drop_eth_bad_source", "Guest frames from a multicast MAC or the gateway's own MAC."),
    ("drop_ethertype_unsupported", "Guest frames that are neither IPv4, IPv6 nor ARP."),
    ("drop_ipv4_disabled", "IPv4 and ARP frames while IPv4 is off (`RelayConfig.ipv4`)."),
    ("drop_ipv6_disabled", "IPv6 frames while IPv6 is off (`RelayConfig.ipv6`)."),
    ("drop_ip_short", "IPv4 packets shorter than their 20-byte header."),
    ("drop_ip_version", "IPv4 frames whose header says another IP version."),
    ("drop_ip_header_len", "IPv4 header lengths under 20 or past the packet."),
    ("drop_ip_total_len", "IPv4 total lengths past the end of the frame."),
    ("drop_ip_fragment", "IPv4 fragments (the relay does not reassemble)."),
    ("drop_ip_checksum", "IPv4 headers with a wrong checksum."),
    ("drop_ip_spoofed_source",
     "Packets from a source that is not the guest's (IPv4: its address, or 0.0.0.0 for "
     "DHCP; IPv6: its prefix or link-local)."),
    ("drop_ip_proto_unsupported",
     "Packets of an IP protocol other than TCP, UDP, ICMP and ICMPv6."),
    ("drop_ip6_short", "IPv6 packets shorter than their 40-byte header."),
    ("drop_ip6_version", "IPv6 frames whose header says another IP version."),
    ("drop_ip6_payload_len", "IPv6 payload lengths past the end of the frame."),
    ("drop_ip6_ext_header",
     "IPv6 extension headers that run past the packet, or too many of them."),
    ("drop_ip6_fragment", "IPv6 fragments (the relay does not reassemble)."),
    ("drop_ip6_unspecified_source",
     "IPv6 packets from :: other than neighbour discovery and DHCPv6."),
    ("drop_tcp_short", "TCP segments shorter than their 20-byte header."),
    ("drop_tcp_header_len", "TCP header lengths under 20 or past the segment."),
    ("drop_tcp_checksum",
     "TCP segments with a wrong checksum, where the transport has them checked (frames "
     "that crossed a socket)."),
    ("drop_udp_short", "UDP datagrams shorter than their 8-byte header."),
    ("drop_udp_len", "UDP lengths under 8 or past the packet."),
    ("drop_udp_multicast_or_broadcast",
     "UDP datagrams to an IPv4 broadcast or multicast address (DHCP aside)."),
    ("drop_udp_unmapped_destination",
     "UDP datagrams to the guest's own address or a link-local one."),
    ("drop_arp_short", "ARP packets shorter than Ethernet/IPv4 ARP."),
    ("drop_arp_format", "ARP packets for another hardware or protocol type than Ethernet/IPv4."),
    ("drop_arp_spoofed_sender", "ARP requests whose sender is neither the guest nor 0.0.0.0."),
    ("drop_icmp_short", "ICMP messages shorter than the 8-byte echo header."),
    ("drop_icmp_checksum", "ICMP messages with a wrong checksum."),
    ("drop_icmp_type",
     "ICMP messages from the guest other than echo requests (neighbour discovery aside)."),
    ("drop_icmp_code", "Echo requests with a nonzero code."),
    ("drop_icmp_no_host",
     "Echo requests to a destination with nothing on the host (the gateway without the "
     "loopback mapping, a host-local address)."),
    ("drop_icmp_not_unicast", "Echo requests to a multicast or broadcast address."),
    ("drop_icmp_closed", "Echo requests after the relay closed its ping sockets."),
    ("drop_icmp_policy", "Echo requests of a new session the egress policy denied."),
    ("drop_icmp_table_full", "Echo requests of a new session while the session table was full."),
    ("drop_icmp_rate_limit", "Echo requests of a new session beyond the new-flow rate."),
    ("drop_icmp_not_permitted",
     "Echo requests the host forbids: ping sockets not allowed to this process "
     "(net.ipv4.ping_group_range)."),
    ("drop_icmp_fd_limit", "Echo requests of a new session: no ping socket, out of descriptors."),
    ("drop_icmp_socket_error", "Echo requests of a new session: no ping socket, another error."),
    ("drop_icmp_send_busy", "Echo requests dropped: the ping socket's send buffer was full."),
    ("drop_icmp_send_error",
     "Echo requests the host would not send (unreachable, not permitted)."),
    ("drop_icmp_reply_foreign",
     "Replies on a ping socket from another address than its session's."),
    ("drop_icmp_reply_short", "Replies on a ping socket shorter than the echo header."),
    ("drop_icmp_reply_type", "Messages on a ping socket that are not echo replies."),
    ("drop_icmp_reply_checksum",
     "Echo replies on the shared raw ICMP socket with a wrong checksum."),
    ("drop_icmp_reply_too_big", "Echo replies too large for the guest's MTU."),
    ("drop_internal_error",
     "Guest frames that met a relay bug (logged with its traceback); should stay 0."),
)

_LINK: _Rows = (
    ("arp_replies", "ARP requests answered (proxy ARP for the guest's subnet)."),
    ("arp_ignored",
     "ARP requests not answered: for the guest's own address, or outside its subnet."),
    ("dhcp_replies", "DHCPv4 replies sent."),
    ("dhcp_no_reply", "DHCPv4 messages that got no reply."),
    ("dhcp_discover", "DHCPDISCOVER messages received."),
    ("dhcp_request", "DHCPREQUEST messages received."),
    ("dhcp_inform", "DHCPINFORM messages received."),
    ("dhcp_decline", "DHCPDECLINE messages received."),
    ("dhcp_release", "DHCPRELEASE messages received."),
    ("dhcp_offer", "DHCPOFFER messages sent."),
    ("dhcp_ack", "DHCPACK messages sent."),
    ("dhcp_nak", "DHCPNAK messages sent (a client asked for an address not its own)."),
    ("dhcp_ignored",
     "DHCPv4 messages not for a server: BOOTREPLY, plain BOOTP, server-to-client or "
     "unknown types."),
    ("dhcp_malformed", "DHCPv4 messages too short or with broken options."),
    ("dhcp_error", "DHCPv4 messages that met a bug in the server; should stay 0."),
    ("dhcp6_replies", "DHCPv6 replies sent."),
    ("dhcp6_no_reply", "DHCPv6 messages that got no reply."),
    ("dhcp6_solicit", "DHCPv6 Solicit messages received."),
    ("dhcp6_request", "DHCPv6 Request messages received."),
    ("dhcp6_confirm", "DHCPv6 Confirm messages received."),
    ("dhcp6_renew", "DHCPv6 Renew messages received."),
    ("dhcp6_rebind", "DHCPv6 Rebind messages received."),
    ("dhcp6_release", "DHCPv6 Release messages received."),
    ("dhcp6_decline", "DHCPv6 Decline messages received."),
    ("dhcp6_information_request", "DHCPv6 Information-request messages received."),
    ("dhcp6_advertise", "DHCPv6 Advertise messages sent."),
    ("dhcp6_reply", "DHCPv6 Reply messages sent."),
    ("dhcp6_malformed",
     "DHCPv6 messages dropped as malformed (most also count their reason below)."),
    ("dhcp6_too_short", "DHCPv6 messages shorter than type and transaction id."),
    ("dhcp6_option_truncated", "DHCPv6 options whose header runs past their container."),
    ("dhcp6_option_past_end", "DHCPv6 options whose value runs past their container."),
    ("dhcp6_bad_client_id", "DHCPv6 client identifiers of an impossible length."),
    ("dhcp6_ia_short", "DHCPv6 IA options shorter than their fixed fields."),
    ("dhcp6_iaaddr_short", "DHCPv6 IA Address options shorter than their fixed fields."),
    ("dhcp6_not_from_client", "DHCPv6 server or relay messages from the guest, ignored."),
    ("dhcp6_unknown_type", "DHCPv6 messages of an unknown type, ignored."),
    ("dhcp6_no_client_id", "DHCPv6 messages without the client identifier they need, ignored."),
    ("dhcp6_no_server_id", "DHCPv6 messages without the server identifier they need, ignored."),
    ("dhcp6_unexpected_server_id",
     "DHCPv6 messages with a server identifier they must not carry, ignored."),
    ("dhcp6_foreign_server_id", "DHCPv6 messages for another server, ignored."),
    ("dhcp6_information_request_with_ia",
     "DHCPv6 Information-requests carrying an IA, ignored (RFC 8415 §16.12)."),
    ("dhcp6_confirm_without_addresses",
     "DHCPv6 Confirms without addresses, unanswered (RFC 8415 §18.3.3)."),
    ("dhcp6_error", "DHCPv6 messages that met a bug in the server; should stay 0."),
    ("ndp_replies",
     "Neighbour discovery messages sent to the guest (advertisements and solicitations)."),
    ("ndp_ra_rate_limited", "Solicited router advertisements not sent: rate limit."),
    ("ndp_ra_sent", "Router advertisements built, solicited and periodic."),
    ("ndp_ns_sent", "Neighbour solicitations sent for the guest's address."),
    ("ndp_rs", "Router solicitations received."),
    ("ndp_ns_answered", "Neighbour solicitations answered with an advertisement."),
    ("ndp_ns_dad_ignored",
     "Duplicate address detection probes from the guest, left unanswered (RFC 4862 §5.4.3)."),
    ("ndp_ns_guest_target", "Neighbour solicitations for one of the guest's own addresses."),
    ("ndp_ns_not_ours", "Neighbour solicitations for an address the relay does not answer for."),
    ("ndp_ra_ignored", "Router advertisements from the guest, ignored."),
    ("ndp_na_ignored", "Neighbour advertisements from the guest, ignored."),
    ("ndp_redirect_ignored", "Redirects from the guest, ignored."),
    ("ndp_not_ndp", "ICMPv6 messages of another type handed to neighbour discovery."),
    ("ndp_bad_arguments", "Neighbour discovery messages with impossible addresses."),
    ("ndp_icmpv6_short", "ICMPv6 messages shorter than their 4-byte header."),
    ("ndp_bad_hop_limit", "Neighbour discovery messages whose hop limit is not 255."),
    ("ndp_bad_checksum", "Neighbour discovery messages with a wrong checksum."),
    ("ndp_bad_code", "Neighbour discovery messages with a nonzero code."),
    ("ndp_rs_short", "Router solicitations shorter than their fixed fields."),
    ("ndp_rs_unspecified_with_slla",
     "Router solicitations from :: with a link-layer address option (RFC 4861 §6.1.1)."),
    ("ndp_ns_short", "Neighbour solicitations shorter than their fixed fields."),
    ("ndp_ns_multicast_target", "Neighbour solicitations for a multicast target."),
    ("ndp_ns_bad_dad",
     "Duplicate address detection probes not to a solicited-node group, or with a "
     "link-layer address option."),
    ("ndp_option_truncated", "Neighbour discovery options whose header runs past the message."),
    ("ndp_option_zero_length", "Neighbour discovery options of length 0."),
    ("ndp_option_past_end", "Neighbour discovery options that run past the message."),
    ("ndp_error", "Neighbour discovery messages that met a bug in the responder; should stay 0."),
)

_DNS: _Rows = (
    ("dns_static_answers", "DNS queries over UDP answered from the static records."),
    ("dns_forwarded_udp", "DNS queries over UDP forwarded to the upstream resolver."),
    ("dns_tcp_static", "DNS queries over TCP answered from the static records."),
    ("dns_tcp_forwarded", "DNS queries over TCP forwarded to the upstream resolver."),
    ("dns_tcp_refused", "DNS-over-TCP connections refused: too many clients."),
    ("dns_tcp_not_guest",
     "Connections to the DNS-over-TCP responder from something else than the relay, closed."),
    ("dns_upstream_changes",
     "Times the host's resolv.conf named another upstream resolver, which new DNS flows use."),
    ("dns_resolv_conf_unusable",
     "Times the host's resolv.conf changed to name no nameserver (or went away); the last "
     "upstream resolver was kept."),
    ("dns_refused",
     "DNS queries answered REFUSED by the relay and never forwarded: under a policy "
     "that allows by name (domain rules, default deny), no allow rule covers the name, "
     "or the query is not one readable question."),
    ("dns_empty",
     "HTTPS and SVCB queries (types 65, 64) for allowed names answered with no data by "
     "the relay, so that clients fall back to A and AAAA."),
    ("dns_dropped",
     "DNS queries too short for a header, dropped unanswered under a policy that "
     "allows by name."),
    ("dns_addresses_learned",
     "Addresses learned from A and AAAA answers (CNAME chains followed) for the "
     "policy's domain rules."),
    ("dns_answers_unread",
     "DNS answers the relay could not read for the policy's domain rules (passed to "
     "the guest unchanged; nothing learned)."),
    ("dns_names_evicted",
     "Learned (name, address) pairs pushed out of the guest's bounded table by newer "
     "ones (max_dns_names)."),
)

_TCP: _Rows = (
    ("tcp_flows_opened", "Outbound TCP flows whose host connect() was started."),
    ("tcp_connects_at_once",
     "Of those, connects already complete on return from connect() (a peer on this host)."),
    ("tcp_connect_failed", "Host connect()s that failed; the guest got a RST."),
    ("tcp_first_flights",
     "Outbound TCP flows a domain rule allowed on an inspected port: the relay answered "
     "the guest's handshake before any host connect, to read the name in its first "
     "flight (TLS SNI, HTTP Host)."),
    ("tcp_first_flights_denied",
     "Of those, flows reset because of their first flight (the `policy_denied_<reason>` "
     "counters say why); they never had a host connect."),
    ("tcp_inbound_opened", "TCP flows opened by a client of a forwarded port."),
    ("tcp_inbound_refused_flow_limit", "Forwarded TCP clients refused: max_tcp_flows reached."),
    ("tcp_inbound_no_guest", "Forwarded TCP clients refused: no guest attached."),
    ("tcp_refused_unmapped",
     "Guest SYNs to a destination with nothing on the host, answered with a RST."),
    ("tcp_refused_flow_limit", "Guest SYNs refused with a RST: max_tcp_flows reached."),
    ("tcp_refused_connect_limit",
     "Guest SYNs refused with a RST: max_pending_connects host connects under way."),
    ("tcp_refused_rate_limit", "Guest SYNs refused with a RST: beyond new_flow_rate."),
    ("tcp_refused_fd_limit", "Guest SYNs refused with a RST: no host socket, out of descriptors."),
    ("tcp_refused_socket", "Guest SYNs refused with a RST: no host socket, another error."),
    ("tcp_syn_deferred", "Guest SYNs beyond syn_rate, kept in the backlog to open later."),
    ("tcp_syn_backlog_dropped", "Guest SYNs dropped: the backlog was full."),
    ("tcp_syn_backlog_repeated",
     "Guest SYNs dropped as a retransmission of one already in the backlog."),
    ("tcp_unknown_flow", "Guest segments of no open flow that are not a SYN, answered with a RST."),
    ("tcp_rst_sent", "RSTs sent to the guest for refused SYNs and segments of no flow."),
    ("tcp_flows_closed", "TCP flows ended (closed, reset or timed out) and removed."),
    ("tcp_flows_closed_on_detach",
     "TCP flows ended because the guest went away (transport lost or detached)."),
    ("tcp_host_resets", "TCP flows whose host socket was closed with a RST."),
    ("tcp_host_errors", "Errors on TCP host sockets (read, write, EPOLLERR)."),
    ("tcp_internal_errors",
     "TCP flows reset after meeting a relay bug (logged with its traceback); should stay 0."),
    ("tcp_rto_expiries", "Retransmission timeouts of data sent to the guest."),
    ("tcp_retransmits", "Go-back-N resends to the guest after a retransmission timeout."),
    ("tcp_sack_resends", "Holes resent to the guest as its SACK blocks showed (RFC 6675)."),
    ("tcp_loss_probes", "Tail loss probes sent to the guest (RFC 8985)."),
    ("tcp_gathered_writes",
     "Host socket writes that carried several guest segments of one wakeup."),
    ("tcp_rcvbuf_grown", "Host socket receive buffers doubled to follow a flow's flight."),
    ("tcp_rcvbuf_budget_full",
     "Receive buffer growths refused: the relay's budget for them was used up."),
    ("tcp_ooo_segments", "Out-of-order guest segments held until the hole before them fills."),
    ("tcp_ooo_drop_window", "Out-of-order guest segments cut at the right edge of the window."),
    ("tcp_ooo_drop_blocks",
     "Out-of-order guest segments dropped: the flow already held as many blocks as it may."),
    ("tcp_ooo_drop_budget",
     "Out-of-order guest segments dropped: the relay's out-of-order byte budget was used up."),
    ("tcp_ooo_reneged_bytes", "Out-of-order bytes given up to make room for earlier ones."),
    ("tcp_ooo_peak_bytes",
     "The most bytes the out-of-order queues held at once (a peak, not a count)."),
    ("tcp_flows_exported", "TCP flows exported to another relay (TCP_REPAIR or handover)."),
    ("tcp_flows_imported", "TCP flows imported from another relay."),
    ("tcp_import_failed", "Imported TCP flows whose socket failed to leave repair mode, reset."),
    ("tcp_bytes_from_guest",
     "TCP payload bytes from the guest, over every flow, open and closed."),
    ("tcp_bytes_to_guest", "TCP payload bytes to the guest, over every flow, open and closed."),
)

_UDP: _Rows = (
    ("udp_flows_opened", "Outbound UDP flows opened (a connected host socket each)."),
    ("udp_flows_expired", "UDP flows closed after their idle timeout."),
    ("udp_inbound_opened", "UDP flows opened by a datagram to a forwarded port."),
    ("udp_inbound_drop_flow_limit",
     "Datagrams to a forwarded port dropped: the flow table was full."),
    ("udp_inbound_no_guest", "Datagrams to a forwarded port dropped: no guest attached."),
    ("udp_to_host", "Guest datagrams sent to the host."),
    ("udp_to_host_bytes", "Payload bytes of those."),
    ("udp_to_guest", "Datagrams sent to the guest."),
    ("udp_to_guest_bytes", "Payload bytes of those."),
    ("udp_drop_flow_limit", "Guest datagrams of a new flow dropped: the flow table was full."),
    ("udp_drop_rate_limit", "Guest datagrams of a new flow dropped: beyond new_flow_rate."),
    ("udp_drop_fd_limit",
     "Guest datagrams of a new flow dropped: no host socket, out of descriptors."),
    ("udp_socket_failed", "Guest datagrams of a new flow dropped: no host socket, another error."),
    ("udp_connect_failed",
     "Guest datagrams of a new flow dropped: the host socket's connect() failed."),
    ("udp_drop_host_busy", "Guest datagrams dropped: the host socket's send buffer was full."),
    ("udp_send_errors", "Guest datagrams the host socket failed to send."),
    ("udp_recv_errors", "Errors reading a UDP host socket."),
    ("udp_drop_too_big_for_mtu", "Host datagrams too large for the guest's MTU, dropped."),
    ("udp_drop_no_guest_mac", "Host datagrams dropped: the guest's MAC was not known yet."),
    ("udp_icmp_port_unreachable",
     "ICMP port unreachable sent to the guest: the host peer's port is closed."),
    ("udp_refused_unreported",
     "Closed host ports not reported to the guest (no MAC or nothing to quote yet)."),
    ("udp_refused_unmapped",
     "ICMP port unreachable sent to the guest for a datagram to nowhere on the host."),
    ("udp_icmp_no_route",
     "ICMP destination unreachable sent to the guest: the host has no route there."),
    ("udp_icmp_rate_limited", "ICMP errors toward the guest not sent: rate limit."),
)

_ICMP: _Rows = (
    ("icmp_echo_requests", "Echo requests from the guest (ping, IPv4 and IPv6)."),
    ("icmp_echo_sent", "Echo requests sent on a host ping socket."),
    ("icmp_echo_replies", "Echo replies sent to the guest."),
    ("icmp_sockets_opened", "Host ping sockets opened (one per session)."),
    ("icmp_sockets_expired", "Ping sessions closed after their idle timeout."),
    ("icmp_host_errors", "ICMP errors reported on a ping socket (e.g. host unreachable)."),
    ("icmp_raw_sockets_opened",
     "Raw ICMP or ICMPv6 sockets opened for pings, ping sockets being refused (one per "
     "family per process, shared by its relays)."),
    ("icmp_raw_sessions_opened", "Ping sessions opened on the shared raw socket."),
    ("icmp_raw_sessions_expired",
     "Ping sessions on the shared raw socket closed after their idle timeout."),
    ("icmp_raw_replies_ignored",
     "Echo replies on the shared raw socket delivered to no guest: no session in the "
     "process sent that identifier to that address, or this relay's session never sent "
     "that sequence number (e.g. the host's own pings); the former counted by every "
     "relay using the socket."),
    ("drop_icmp_ids_exhausted",
     "Echo requests of a new raw-socket session: every identifier toward that address "
     "in use."),
)

_POLICY: _Rows = (
    ("policy_allowed", "New guest flows the egress policy allowed."),
    ("policy_denied", "New guest flows the egress policy denied."),
    ("policy_denied_default", "Of those, denied by the policy's default."),
    ("policy_denied_unlogged", "Denials not logged: the denial log's rate limit."),
    ("policy_denied_name_mismatch",
     "TCP flows a domain rule allowed, reset: the TLS SNI or HTTP Host of their first "
     "flight is not a name the rule covers, or the destination was not learned for it."),
    ("policy_denied_no_sni", "Such flows reset: a TLS ClientHello without server_name."),
    ("policy_denied_no_host",
     "Such flows reset: an HTTP/1 request without exactly one Host (or an absolute-form "
     "target naming another host, or CONNECT)."),
    ("policy_denied_ech",
     "Such flows reset: a ClientHello with Encrypted Client Hello and no outer SNI."),
    ("policy_denied_unknown_protocol",
     "Such flows reset: a first flight that is neither a TLS ClientHello nor an HTTP/1 "
     "request (or a malformed one)."),
    ("policy_denied_first_flight_timeout",
     "Such flows reset: no name within `first_flight_timeout_s` (10 s)."),
    ("policy_denied_first_flight_too_big", "Such flows reset: no name within 16 KiB."),
    ("policy_cut_tcp", "Open TCP flows ended because a new policy denies them (`cut`)."),
    ("policy_cut_udp", "Open UDP flows ended because a new policy denies them (`cut`)."),
    ("policy_cut_icmp", "Ping sessions ended because a new policy denies them (`cut`)."),
)

_OUTSIDE: _Rows = (
    ("stream_clients", "Guests accepted on the `serve_stream` socket."),
    ("stream_clients_refused",
     "Clients refused on the `serve_stream` socket: a guest was already attached."),
    ("handovers_sent", "Handovers of this relay's guest to a new relay process that succeeded."),
    ("handovers_failed",
     "Handovers that failed, after which this relay serves on as before."),
    ("handovers_received", "Handovers this relay took over."),
    ("handovers_refused", "Handovers this relay refused (the reason is logged)."),
    ("handover_pause_us",
     "Microseconds the guest waited during the handovers taken over, summed."),
    ("events_dropped", "Events lost by a `Relay.events()` reader that fell behind."),
    ("audit_dropped",
     "Events an attached `AuditLog` (`--audit`) dropped: its writer fell behind and its "
     "queue was full."),
)

_SPLICE: _Rows = (
    ("splice_opened",
     "Forwarded TCP clients on the host's loopback spliced to the guest's loopback (its "
     "service answered)."),
    ("splice_reverse_opened",
     "Connections the guest made to a -T port, spliced to the host's loopback (its service "
     "answered)."),
    ("splice_refused",
     "Spliced connections whose far side refused or could not be reached (no service, no "
     "descriptor); the near side got a RST at once."),
    ("splice_refused_limit",
     "Spliced connections refused with a RST: max_tcp_flows spliced connections open."),
    ("splice_fallback",
     "Forwarded TCP clients on the host's loopback served through the guest's link instead: no "
     "socket of the guest's namespace to be had."),
    ("splice_closed",
     "Spliced connections ended by both sides' FIN."),
    ("splice_resets",
     "Spliced connections ended by a reset or an error on one side, passed on to the other as "
     "a RST."),
    ("splice_bytes_to_guest",
     "Bytes spliced toward the guest by spliced connections that ended."),
    ("splice_bytes_from_guest",
     "Bytes spliced from the guest by spliced connections that ended."),
    ("loopback_udp_flows",
     "Guest senders to a -U port given a host socket toward the host's loopback."),
    ("loopback_udp_from_guest",
     "Datagrams from the guest to a -U port sent on to the host's loopback."),
    ("loopback_udp_to_guest",
     "Datagrams from the host's loopback returned to the guest's -U sender."),
    ("loopback_udp_dropped",
     "-U datagrams dropped: no host socket (limit, descriptors), or a send that failed "
     "(nothing on the port, buffer full)."),
)

_GAUGES: _Rows = (
    ("tcp_flows", "TCP flows open now."),
    ("udp_flows", "UDP flows open now."),
    ("icmp_sockets", "Host ping sockets open now."),
    ("tcp_first_flight_bytes",
     "Guest bytes held now by TCP flows whose first flight is read before their host "
     "connect (at most 16 KiB a flow, `max_pending_connects` flows)."),
    ("splice_flows", "Spliced TCP connections open now (forwards and -T)."),
)

#: The counters in sections, as docs/stats.md shows them.
GROUPS: tuple[tuple[str, _Rows], ...] = (
    ("Frames and the guest", _FRAMES),
    ("Guest frames dropped", _DROPS),
    ("Link services: ARP, DHCPv4, DHCPv6, neighbour discovery", _LINK),
    ("DNS", _DNS),
    ("TCP", _TCP),
    ("UDP", _UDP),
    ("ICMP echo", _ICMP),
    ("Egress policy", _POLICY),
    ("Streams, handovers and events", _OUTSIDE),
    ("Spliced forwards and loopback forwards", _SPLICE),
    ("Gauges", _GAUGES),
)

#: Every fixed name `Relay.stats()` reports, with what it counts.
COUNTERS: Mapping[str, str] = MappingProxyType(
    {name: meaning for _title, rows in GROUPS for name, meaning in rows})

#: The names of COUNTERS that say what is open now rather than count since the start.
GAUGES: frozenset[str] = frozenset(name for name, _meaning in _GAUGES)

#: Families of names that appear only once they count something, `{N}` the open part.
PATTERNS: Mapping[str, str] = MappingProxyType({
    "policy_denied_rule{N}":
        "New guest flows denied by the policy's rule N (its index in the rule list, from 0).",
})


def with_zeros(counts: Mapping[str, int]) -> dict[str, int]:
    """`counts` with every name of COUNTERS it lacks added as 0."""
    return {name: 0 for name in COUNTERS} | dict(counts)
