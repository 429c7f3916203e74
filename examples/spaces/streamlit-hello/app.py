import os

import streamlit as st

st.title("hangar-example-streamlit")
name = st.text_input("Your name", "world")
st.write(f"Hello, {name}! This is {os.environ.get('SPACE_ID', 'a Space')}.")
