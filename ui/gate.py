"""What stands before every page: the Host check (a web page on another site that points
its own name at this machine, "DNS rebinding", is refused) and, with ui.password, sign-in."""

from __future__ import annotations

import hmac
import logging
import time

import streamlit as st

from rag_app.hosts import names_this_machine
from rag_app.settings import UISettings

log = logging.getLogger(__name__)


def allowed_host(value: str, ui: UISettings) -> bool:
    """A Host/Origin that names this machine (loopback or ui.host). With ui.password the
    app is exposed on purpose and sign-in protects it, so any name is allowed."""
    if ui.password is not None:
        return True
    return names_this_machine(value, ui.host)


def guard(ui: UISettings) -> None:
    """Stop the script unless the request may see the app."""
    headers = st.context.headers
    for key in ("Host", "Origin"):
        value = headers.get(key)
        if value is not None and not allowed_host(value, ui):
            log.warning("refused a request for host %r (header %s)", value, key)
            st.error("This app answers only at its own address (for example "
                     f"http://localhost:{ui.port}).")
            st.stop()
    if ui.password is None or st.session_state.get("signed_in"):
        return
    with st.form("sign-in"):
        st.subheader("Sign in")
        secret = st.text_input("Password", type="password")
        if st.form_submit_button("Sign in"):
            expected = ui.password.get_secret_value().encode()
            if hmac.compare_digest(secret.encode(), expected):
                st.session_state["signed_in"] = True
                st.rerun()
            time.sleep(1)  # slows guessing
            log.warning("a sign-in failed")
            st.error("Wrong password.")
    st.stop()
