"""metaseg's viewer: a Streamlit app that is a client of the metaseg server, never a second model runner."""

from pathlib import Path

APP = Path(__file__).with_name("app.py")  # what `metaseg ui` hands to `streamlit run`
